// Node: kiln-web's tokenizer operators and JavaScript custom operators (the checks are in kiln-ops-checks.mjs,
// shared with the headless Chromium run in browser.mjs).
import { test } from 'node:test';
import fs from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as ort from 'kiln-web';
import { customOpChecks, tokenizerChecks } from './kiln-ops-checks.mjs';

const here = path.dirname(fileURLToPath(import.meta.url));
const file = (p) => (p.startsWith('tok/') ? path.join(here, '../../ops/tests/data/tokenizer', p.slice(4)) : path.join(here, p));
const load = { text: (p) => fs.readFile(file(p), 'utf8'), bytes: async (p) => new Uint8Array(await fs.readFile(file(p))) };

for (const [name, check] of Object.entries({ ...customOpChecks, ...tokenizerChecks })) {
  test(name, async (t) => t.diagnostic(await check(ort, load)));
}
