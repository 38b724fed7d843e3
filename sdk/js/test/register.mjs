// Maps the component's imports (`understudy:function/...@0.1.0`) to fake-host.mjs, so
// the SDK's unit tests run on Node.js (see understudy.test.mjs).
import { register } from 'node:module';

register(
  'data:text/javascript,' +
    encodeURIComponent(`
      export async function resolve(specifier, context, next) {
        if (specifier.startsWith('understudy:function/')) {
          return { url: ${JSON.stringify(new URL('./fake-host.mjs', import.meta.url).href)}, shortCircuit: true };
        }
        return next(specifier, context);
      }`),
);
