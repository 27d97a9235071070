# Source this on the lent GPU machine, from the repository root, before any GPU script:
#     . scripts/device_env.sh
# It unpacks what that machine lacks from the carried .device/ folder (made here by the README's "Developing"
# steps: ../shared/gpu/make-pack.sh, the tiktoken vocabulary, the gpt-oss tokenizer, the llama-cpp-python wheel)
# and sets the offline environment. ../shared does not travel there; .device/ stands in for it.
set -e
tar xzf .device/pack/site.tgz -C /tmp
tar xzf .device/pack/llamacpp.tgz -C /tmp
if ls .device/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
fi
# Optional: llama-cpp-python built elsewhere (its Python package and libraries, + diskcache), e.g. for the GGUF
# figures of scripts/chat_eval_gpu.py; its libraries must suit this machine's glibc and CPU.
if [ -f .device/llama_cpp_cpu.tgz ]; then tar xzf .device/llama_cpp_cpu.tgz -C /tmp/site; fi
if [ -f .device/gpt-oss-20b/tokenizer.json.gz ] && [ ! -f .device/gpt-oss-20b/tokenizer.json ]; then
  gunzip -k .device/gpt-oss-20b/tokenizer.json.gz
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 PYTHONUNBUFFERED=1
export TIKTOKEN_ENCODINGS_BASE=$PWD/.device/tiktoken UNSLOTH_COMPILE_LOCATION=/tmp/ucc TOKENIZERS_PARALLELISM=false
export SWFT_SHARED_MODEL=$PWD/.device/gpt-oss-20b SWFT_LLAMA_CPP=/tmp/llamacpp
set +e
