// Validates the KEDA objects among Kubernetes objects with the models of
// @kubernetes-models/keda (generated from KEDA's API types; see README.md).
//
// stdin:  a JSON array of objects (for example a rendered overlay).
// stdout: a JSON array of {kind, name, error}, one entry per keda.sh object in
//         input order; error is null for a valid object, else the message.
// exit:   0 all valid, 1 any invalid, 2 unreadable input.
import { readFileSync } from "node:fs";

import { ClusterTriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/ClusterTriggerAuthentication";
import { ScaledJob } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledJob";
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1/ScaledObject";
import { TriggerAuthentication } from "@kubernetes-models/keda/keda.sh/v1alpha1/TriggerAuthentication";

const MODELS = { ClusterTriggerAuthentication, ScaledJob, ScaledObject, TriggerAuthentication };

function problem(obj) {
  const Model = Object.hasOwn(MODELS, obj.kind) ? MODELS[obj.kind] : undefined;
  if (Model === undefined) {
    return `no KEDA model for kind ${JSON.stringify(obj.kind)}`;
  }
  try {
    new Model(obj).validate();
    return null;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

let objects;
try {
  objects = JSON.parse(readFileSync(0, "utf8"));
  if (!Array.isArray(objects)) {
    throw new Error("expected a JSON array of objects");
  }
} catch (err) {
  process.stderr.write(`validate.mjs: unreadable input: ${err.message}\n`);
  process.exit(2);
}

const results = objects
  .filter((obj) => typeof obj?.apiVersion === "string" && obj.apiVersion.startsWith("keda.sh/"))
  .map((obj) => ({ kind: obj.kind ?? null, name: obj.metadata?.name ?? null, error: problem(obj) }));
process.stdout.write(`${JSON.stringify(results, null, 2)}\n`);
process.exitCode = results.some((r) => r.error !== null) ? 1 : 0;
