// Validates the chart's custom resources (KEDA ScaledObject/TriggerAuthentication, Prometheus
// Operator ServiceMonitor/PrometheusRule), which the Kubernetes schemas of kubernetes-validate
// do not cover. Two checks per object:
//   1. the validators of @kubernetes-models/keda and @kubernetes-models/prometheus-operator,
//      generated from the projects' own Go API types (types, required fields, enums, formats);
//   2. no unknown field anywhere under the object (those validators allow any), by walking the
//      packages' TypeScript declarations, which list every field of every type.
//
// Usage: node validate_crds.mjs <node_modules dir>  < objects.json   (a JSON array)
// Prints one line per problem and exits 1 if there is any.

import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node validate_crds.mjs <node_modules dir> < objects.json");
  process.exit(2);
}

// apiVersion/kind → the model's module, relative to node_modules.
const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject",
  "keda.sh/v1alpha1/TriggerAuthentication": "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication",
  "monitoring.coreos.com/v1/ServiceMonitor":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor",
  "monitoring.coreos.com/v1/PrometheusRule":
    "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule",
};

// --- a small reader of the packages' .d.ts files ------------------------------------------------

const cache = new Map();

/** The fields of the main interface declared in `file`, and where its field types come from. */
function readDeclarations(file) {
  if (cache.has(file)) return cache.get(file);
  const src = readFileSync(file, "utf8").replace(/\/\*[\s\S]*?\*\//g, "");
  const imports = new Map();
  for (const m of src.matchAll(/import\s*\{([^}]*)\}\s*from\s*"([^"]+)"/g)) {
    for (const name of m[1].split(",").map((s) => s.trim()).filter(Boolean)) {
      imports.set(name, m[2]);
    }
  }
  const start = src.search(/export interface \w+/);
  if (start < 0) {
    // `export type IX = IOther;`: the declaration is IOther's (a primitive or foreign alias: none)
    const alias = /export type \w+ = (\w+);/.exec(src);
    const from = alias && imports.get(alias[1]);
    const decl = from && from.startsWith("./") ? readDeclarations(join(dirname(file), from.replace(/\.js$/, ".d.ts"))) : null;
    cache.set(file, decl);
    return decl;
  }
  const open = src.indexOf("{", start);
  // the body of the interface, up to its closing brace
  let depth = 0;
  let end = open;
  for (; end < src.length; end++) {
    if (src[end] === "{") depth++;
    if (src[end] === "}" && --depth === 0) break;
  }
  const body = src.slice(open + 1, end);
  // top-level `"name"?: type;` entries (types may nest braces and angle brackets)
  const fields = new Map();
  let i = 0;
  while (i < body.length) {
    const m = /"([^"]+)"\??\s*:\s*/y;
    m.lastIndex = i;
    const hit = m.exec(body);
    if (!hit) {
      i++;
      continue;
    }
    let j = m.lastIndex;
    let d = 0;
    for (; j < body.length; j++) {
      const c = body[j];
      if (c === "{" || c === "<" || c === "(") d++;
      if (c === "}" || c === ">" || c === ")") d--;
      if (c === ";" && d === 0) break;
    }
    fields.set(hit[1], body.slice(m.lastIndex, j).trim());
    i = j + 1;
  }
  const decl = { fields, imports, dir: dirname(file) };
  cache.set(file, decl);
  return decl;
}

/** Reports every field of `value` that the declaration in `file` does not have. */
function checkFields(value, file, path, problems) {
  if (value === null || typeof value !== "object" || Array.isArray(value)) return;
  const decl = readDeclarations(file);
  if (!decl) return;
  for (const [key, child] of Object.entries(value)) {
    const type = decl.fields.get(key);
    if (type === undefined) {
      problems.push(`${path}.${key}: unknown field`);
      continue;
    }
    const array = /^Array<(\w+)>$/.exec(type);
    const ident = array ? array[1] : /^\w+$/.test(type) ? type : null;
    const from = ident && decl.imports.get(ident);
    // follow the package's own types; Kubernetes' (ObjectMeta, IntOrString) and maps stop here
    if (!from || !from.startsWith("./")) continue;
    const next = join(decl.dir, from.replace(/\.js$/, ".d.ts"));
    if (array) {
      if (Array.isArray(child)) child.forEach((item, n) => checkFields(item, next, `${path}.${key}[${n}]`, problems));
    } else {
      checkFields(child, next, `${path}.${key}`, problems);
    }
  }
}

// --- main ------------------------------------------------------------------------------------------

const objects = JSON.parse(readFileSync(0, "utf8"));
const problems = [];
for (const obj of objects) {
  const id = `${obj.kind}/${obj.metadata?.name}`;
  const module = MODELS[`${obj.apiVersion}/${obj.kind}`];
  if (!module) {
    problems.push(`${id}: no validator for ${obj.apiVersion} ${obj.kind}`);
    continue;
  }
  const mod = await import(pathToFileURL(join(modules, `${module}.js`)).href);
  const Model = mod[obj.kind];
  try {
    new Model(obj).validate();
  } catch (e) {
    problems.push(`${id}: ${e.message}`);
  }
  checkFields(obj, join(modules, `${module}.d.ts`), id, problems);
}
for (const p of problems) console.log(p);
console.error(`validate_crds: ${objects.length} object(s), ${problems.length} problem(s)`);
process.exit(problems.length ? 1 : 0);
