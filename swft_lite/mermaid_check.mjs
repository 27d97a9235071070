// Parse Mermaid diagrams with Mermaid's own parser (mermaid.parse), for swft-lite's mermaid_valid metric.
// stdin: a JSON list of diagram sources; stdout: a JSON list of {"ok": bool, "error": string|null}.
// argv[2]: the node_modules folder that holds mermaid and jsdom (swft-lite eval --fetch-mermaid installs them).
import { createRequire } from 'module';
import path from 'path';
import { pathToFileURL } from 'url';

const modules = process.argv[2];
const require = createRequire(path.join(modules, 'noop.js'));
const { JSDOM } = require('jsdom');
const dom = new JSDOM('<!DOCTYPE html><body></body>');
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const mermaidEntry = require.resolve('mermaid');
const { default: mermaid } = await import(pathToFileURL(mermaidEntry).href);
mermaid.initialize({ startOnLoad: false });

let input = '';
for await (const chunk of process.stdin) input += chunk;
const diagrams = JSON.parse(input);
const out = [];
for (const d of diagrams) {
  try {
    await mermaid.parse(d);
    out.push({ ok: true, error: null });
  } catch (e) {
    const msg = String((e && e.message) || e).split('\n').filter((l) => l.trim()).slice(0, 4).join(' | ');
    out.push({ ok: false, error: msg });
  }
}
process.stdout.write(JSON.stringify(out));
