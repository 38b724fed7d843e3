// Builds one JavaScript guest into a component with componentize-js (called directly:
// `jco componentize` 1.35 cannot read the WIT folder here).
//
//   node scripts/componentize-js.mjs --wit wit --world function --out app.wasm app.js
//
// --tools is the folder whose node_modules holds the pinned componentize-js
// (scripts/build-guests.sh installs it under target-guests/). `wasi:http` and the fetch event are disabled:
// the node does not provide `wasi:http`, and a component that imports it is refused.
import { writeFile } from 'node:fs/promises';
import { parseArgs } from 'node:util';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const { values, positionals } = parseArgs({
  options: {
    wit: { type: 'string' },
    world: { type: 'string' },
    out: { type: 'string' },
    tools: { type: 'string' },
  },
  allowPositionals: true,
});
if (!values.wit || !values.world || !values.out || !values.tools || positionals.length !== 1) {
  console.error('usage: componentize-js.mjs --tools DIR --wit DIR --world NAME --out FILE SOURCE.js');
  process.exit(2);
}
// componentize-js is installed under --tools, not beside this script; its package
// exports only an `import` entry, so name the file.
const entry = path.resolve(values.tools, 'node_modules/@bytecodealliance/componentize-js/src/componentize.js');
const { componentize } = await import(pathToFileURL(entry).href);

const { component } = await componentize({
  sourcePath: path.resolve(positionals[0]),
  witPath: path.resolve(values.wit),
  worldName: values.world,
  disableFeatures: ['http', 'fetch-event'],
});
await writeFile(values.out, component);
