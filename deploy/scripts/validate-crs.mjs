// Validate prometheus-operator custom resources (ServiceMonitor, PodMonitor,
// PrometheusRule) in rendered manifests against the CRD schemas shipped in
// @kubernetes-models/prometheus-operator; kubernetes-validate only knows
// built-in kinds. deploy/ci-validate.sh copies this file next to the
// node_modules holding that package and js-yaml, and runs
// `node validate-crs.mjs FILE...`.
import { readFileSync } from "node:fs";
import * as yaml from "js-yaml";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const kinds = { ServiceMonitor, PodMonitor, PrometheusRule };
let bad = 0;
let n = 0;
for (const f of process.argv.slice(2)) {
  for (const d of yaml.loadAll(readFileSync(f, "utf8"))) {
    if (!d || d.apiVersion !== "monitoring.coreos.com/v1" || !kinds[d.kind]) continue;
    n++;
    try {
      new kinds[d.kind](d).validate();
    } catch (e) {
      bad++;
      console.error(`FAIL ${f} ${d.kind}/${d.metadata?.name}: ${e.message}`);
    }
  }
}
console.log(`${n} custom resources checked, ${bad} failed`);
process.exit(bad ? 1 : 0);
