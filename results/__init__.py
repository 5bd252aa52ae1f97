"""One typed result, from the engine to the API: what a run measured, per attribute and per group. The worker
builds it, the database stores it as JSON, the API serves it (adding ids, links and the policy's verdict), the
CSV flattens it and the HTML renders it; each figure is named and documented here once. Pure pydantic, no torch.

Accuracies are fractions (0.01 = one percentage point), losses mean cross-entropy in nats. A figure that is
undefined is null and an `undefined` map says why: a result never holds NaN or infinity (validation refuses
them)."""
