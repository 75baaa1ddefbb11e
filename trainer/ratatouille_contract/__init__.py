"""The contract between the operator and the trainer, imported by both (docs/contract.md).

- `jobdesc`: the job description, the JSON one child Job is told what to do with;
- `hparams`: the hyperparameter draws the planner writes into job descriptions;
- `layout`: every storage key and file name (run and cache prefixes, members' outputs, the files
  inside a member's prefix).

Standard library only, and neither `ratatouille_operator` nor `ratatouille_trainer`: both images
install it, and the layer test (tests/test_layers.py) keeps the arrows pointing here.
"""
