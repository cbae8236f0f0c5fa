// Validates custom resources against the published CRD schemas, as compiled by the kubernetes-models
// packages (ServiceMonitor, PrometheusRule: prometheus-operator; ScaledObject: KEDA).
//   node validate.mjs MODULES_DIR OBJECTS.json  ->  prints [{kind, name, errors}] as JSON
// MODULES_DIR holds node_modules (make tools: .venv-tools/crd). Objects of other kinds: errors null.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, objectsFile] = process.argv.slice(2);
const models = {
  "monitoring.coreos.com/v1/ServiceMonitor": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor.js",
  "monitoring.coreos.com/v1/PrometheusRule": "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule.js",
  "keda.sh/v1alpha1/ScaledObject": "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject.mjs",
};
const results = [];
for (const obj of JSON.parse(readFileSync(objectsFile, "utf8"))) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  const entry = { kind: obj.kind, name: obj.metadata?.name ?? null, errors: null };
  if (key in models) {
    const mod = await import(pathToFileURL(join(modules, "node_modules", models[key])).href);
    const Model = mod[obj.kind];
    try {
      new Model(obj).validate();
      entry.errors = [];
    } catch (e) {
      entry.errors = [String(e.message ?? e)];
    }
  }
  results.push(entry);
}
console.log(JSON.stringify(results));
