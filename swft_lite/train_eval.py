"""Evaluation during `swft-lite train`: eval loss, the wiki-agent metrics on generated answers, early stopping.

At every evaluation (--eval-steps) the Trainer measures the eval loss, teacher-forced on the eval rows with the
training masks (the labels the data step rendered). With --eval-generate N, the model being trained also answers
the last user turn of the first N conversations of the eval file (greedy, at most --eval-max-new-tokens tokens,
through swft_lite.evaluate: the prompt rendered by openai-harmony as `swft-lite eval` renders it, the reply parsed
by harmony's parser), and the answers are scored with swft_lite.metrics - the same functions `swft-lite eval`
uses. The figures join the Trainer's eval metrics (eval_loss, eval_perplexity, eval_source_refs, eval_markdown_valid,
eval_mermaid_valid, eval_format_ok, eval_final_present, ...), so they reach TensorBoard (eval/NAME), run.json's
`eval_metrics` history, the Trainer's own log history, and the best-checkpoint choice and early stopping, which
watch any one of them (--early-stopping-metric; loss: lower is better, the shares: higher is better).

The answers of each evaluation are kept in RUN/eval_generations/step-N.jsonl (swft-lite eval's --rows-out format).

Early stopping is transformers' own: metric_for_best_model / greater_is_better / load_best_model_at_end (which
needs --save-steps a multiple of --eval-steps: the best checkpoint is one of the saved ones) and its
EarlyStoppingCallback; run.json's `early_stopping` says whether it stopped the run, at which step and why.

A share is undefined when there is nothing to count (source_refs: no claims in any answer; mermaid_valid: no
Mermaid block). It is then left out of the logs; when it is the watched metric it counts as 0 (the worst value)
for the best-checkpoint choice and early stopping, and run.json's `early_stopping.undefined_at_steps` lists those
evaluations.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from swft_lite import distributed
from swft_lite.errors import TrainError

# name -> greater is better. eval_loss is the Trainer's; the rest are swft_lite.metrics.summarize's shares.
EARLY_STOPPING_METRICS = {"eval_loss": False, "source_refs": True, "markdown_valid": True, "mermaid_valid": True,
                          "format_ok": True, "final_present": True}
# summarize()'s figures logged at each evaluation (as eval_NAME), beside the generation's own counts.
GENERATION_METRICS = ("source_refs", "markdown_valid", "mermaid_valid", "format_ok", "final_present",
                      "reasoning_chars_mean", "claims", "cited_claims", "mermaid_blocks", "leaked_markup_rows")


def metric_key(name: str) -> str:
    """The Trainer's key for a metric name: eval_loss stays, source_refs becomes eval_source_refs."""
    return name if name.startswith("eval_") else f"eval_{name}"


def greater_is_better(name: str) -> bool:
    return EARLY_STOPPING_METRICS[name]


def _valid_names() -> str:
    return ", ".join(EARLY_STOPPING_METRICS)


def check_options(options, prepared) -> None:
    """The eval options against each other and against the data, before a model is loaded. A TrainError names the
    flag and what to do."""
    metric = options.early_stopping_metric
    if metric not in EARLY_STOPPING_METRICS:
        raise TrainError(f"--early-stopping-metric {metric}: unknown metric; one of {_valid_names()}")
    has_eval = prepared.eval is not None
    if metric != "eval_loss" and not options.eval_generate:
        raise TrainError(f"--early-stopping-metric {metric} is measured on generated answers: add --eval-generate N "
                         "(N eval rows answered at each evaluation), or watch eval_loss")
    if options.early_stopping_patience and not has_eval:
        raise TrainError("--early-stopping-patience needs eval data: add --eval-data VAL.jsonl or --eval-fraction")
    if options.early_stopping_patience and options.save_steps % options.eval_steps:
        raise TrainError(f"--early-stopping-patience needs --save-steps ({options.save_steps}) to be a multiple of "
                         f"--eval-steps ({options.eval_steps}): the best model is kept from a saved checkpoint. "
                         f"E.g. --save-steps {options.eval_steps * max(1, options.save_steps // options.eval_steps)}")
    if options.eval_generate:
        generation_rows(options, prepared)  # reads and renders the rows now: a bad one stops the run here


def eval_file(options, prepared) -> str:
    """The eval file the generation rows come from (the one the data step read)."""
    rep = prepared.report
    if prepared.eval is None:
        raise TrainError("--eval-generate needs eval data: add --eval-data VAL.jsonl (conversations in the chat "
                         "format)")
    if rep.get("eval_source") != "file":
        raise TrainError("--eval-generate needs an eval file (--eval-data VAL.jsonl): rows split off with "
                         "--eval-fraction exist only as rendered tokens, with no conversation to answer")
    return next(name for name, f in rep["files"].items() if f.get("role") == "eval")


def _data_options(options, max_seq_length: int | None = None):
    from swft_lite.data import DataOptions

    kw = {} if max_seq_length is None else {"max_seq_length": max_seq_length}
    return DataOptions(mask=options.mask, reasoning_effort=options.reasoning_effort, date=options.date, **kw)


def generation_rows(options, prepared):
    """The first --eval-generate conversations of the eval file, each checked to render as a prompt."""
    from swft_lite import evaluate as ev

    path = eval_file(options, prepared)
    try:
        rows = ev.read_data(path)[:options.eval_generate]
        for r in rows:
            ev._prompt_tokens(r, _data_options(options))
    except ev.EvalError as exc:
        raise TrainError(f"--eval-generate: {exc}") from None
    return rows


class _GenerationEval:
    """Answers the generation rows with the model being trained and scores them (called inside the Trainer's
    evaluation loop, so the figures join its eval metrics)."""

    def __init__(self, trainer, rows, options, out_dir: Path, echo):
        from swft_lite import metrics as M

        self.trainer, self.rows, self.options, self.out_dir, self.echo = trainer, rows, options, out_dir, echo
        self.checker, why = M.mermaid_checker("auto")
        self.checker_note = self.checker.description + (f" ({why})" if why else "")

    def __call__(self, step: int) -> dict:
        import torch

        from swft_lite import evaluate as ev
        from swft_lite.inference import HFEngine

        model = self.trainer.model
        device = str(next(model.parameters()).device)
        was_training = model.training
        config = getattr(model, "config", None)
        use_cache = getattr(config, "use_cache", None)
        model.eval()
        if config is not None:
            config.use_cache = True  # training turns the KV cache off; generation without it re-reads the prompt
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                answers, gen = ev.generate_answers(HFEngine(model, device, "the model being trained"), self.rows,
                                                   _data_options(self.options),
                                                   max_new_tokens=self.options.eval_max_new_tokens,
                                                   temperature=0.0, seed=0)
        finally:
            if config is not None:
                config.use_cache = use_cache
            model.train(was_training)
        result = ev.score(f"step {step}", "the model being trained", self.rows, answers, self.checker)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main_process():  # every rank generates the same answers (same model); rank 0 writes them
            ev.write_rows(self.out_dir / f"step-{step}.jsonl", self.rows, [result])
        s = result.summary
        figures = {k: s[k] for k in GENERATION_METRICS if s.get(k) is not None}
        figures.update(generated_tokens=gen["generated_tokens"], generation_seconds=round(time.perf_counter() - t0, 3))
        if gen["tokens_per_s"] is not None:
            figures["generation_tokens_per_s"] = gen["tokens_per_s"]
        return figures


def attach(trainer, args, options, prepared, run, run_log: dict, record, echo) -> None:
    """Hook the eval figures, their history and early stopping into `trainer` (built with `args`)."""
    from transformers import EarlyStoppingCallback, TrainerCallback

    if prepared.eval is None:
        return
    run_log.setdefault("eval_metrics", record.history("eval_metrics"))
    watched = metric_key(options.early_stopping_metric)
    selecting = args.metric_for_best_model is not None
    stopping = run_log.setdefault("early_stopping", {})
    stopping.update({"metric": options.early_stopping_metric, "greater_is_better": greater_is_better(
        options.early_stopping_metric), "patience": options.early_stopping_patience,
        "enabled": bool(options.early_stopping_patience and selecting)})
    stopping.setdefault("stopped", False)

    generate = None
    if options.eval_generate:
        generate = _GenerationEval(trainer, generation_rows(options, prepared), options, run.eval_generations, echo)
        run_log["eval_generate"] = {"rows": len(generate.rows), "file": eval_file(options, prepared),
                                    "max_new_tokens": options.eval_max_new_tokens,
                                    "mermaid_checker": generate.checker_note,
                                    "answers": str(run.eval_generations)}

    # The Trainer's evaluate() logs output.metrics and hands the same dict to the callbacks and to the
    # best-checkpoint choice, so figures added here reach all of them.
    loop = trainer.evaluation_loop

    def evaluation_loop(*a, **kw):
        output = loop(*a, **kw)
        prefix = kw.get("metric_key_prefix", a[4] if len(a) > 4 else "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None and loss < 700:
            output.metrics[f"{prefix}_perplexity"] = math.exp(loss)
        if generate is not None and prefix == "eval":
            output.metrics.update({f"eval_{k}": v for k, v in generate(trainer.state.global_step).items()})
        return output

    trainer.evaluation_loop = evaluation_loop

    class EvalHistory(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "eval_loss" in logs:
                entry = {"step": state.global_step}
                entry.update({k[5:]: v for k, v in logs.items() if k.startswith("eval_")
                              and isinstance(v, (int, float)) and not isinstance(v, bool)})
                run_log["eval_metrics"].append(entry)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            # Registered before the early-stopping callback: an undefined share counts as its worst value.
            if selecting and metrics is not None and watched not in metrics:
                metrics[watched] = 0.0
                stopping.setdefault("undefined_at_steps", []).append(state.global_step)

        def on_train_end(self, args, state, control, **kw):
            losses = [e["loss"] for e in run_log["eval_metrics"] if e.get("loss") is not None]
            # run_training records state.best_metric as best_eval_loss: that is the loss only when it is watched.
            run_log["best_eval_loss"] = min(losses) if losses else None
            run_log["best_metric"] = {"metric": options.early_stopping_metric, "value": state.best_metric,
                                      "step": state.best_global_step, "checkpoint": state.best_model_checkpoint}

    trainer.add_callback(EvalHistory())

    if not stopping["enabled"]:
        return

    class EarlyStopping(EarlyStoppingCallback):
        """transformers' early stopping, and the reason it stopped the run in run.json."""

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            super().on_evaluate(args, state, control, metrics, **kw)
            if control.should_training_stop and self.early_stopping_patience_counter >= self.early_stopping_patience:
                best = state.best_metric
                reason = (f"{options.early_stopping_metric} did not improve on its best, {best:.6g} at step "
                          f"{state.best_global_step}, for {self.early_stopping_patience_counter} evaluation(s) "
                          f"(patience {self.early_stopping_patience}; "
                          f"{'higher' if args.greater_is_better else 'lower'} is better); last "
                          f"{metrics.get(watched):.6g} at step {state.global_step}")
                stopping.update(stopped=True, at_step=state.global_step, best=best,
                                best_step=state.best_global_step, reason=reason)
                echo(f"\nearly stopping: {reason}")

    trainer.add_callback(EarlyStopping(early_stopping_patience=options.early_stopping_patience))
