"""The steps of `planner.plan()`, one decision per module (pure: standard library, `spec`, the
contract package `ratatouille_contract`):

- `vocabulary`: stages, states, phases, labels, reasons; the planner's inputs and outputs;
- `naming`: Job names and labels, members' outputs, the auxiliary cache entries and their keys;
- `graph`: initialization sources, the members and their states;
- `describe`: each member's job description;
- `policy`: pod start timeout, outcome, suspend, retries with backoff, the parallelism budget;
- `status` and `events`: what the run reports.
"""
