"""What a platform team allows runs to ask for, beyond what the CRD's schema allows.

Anyone who may create a RatatouilleRun chooses the image its trainer pods run (under the Jobs'
service account), the tolerations that let them onto tainted nodes, and the priority class
that may preempt other work. The operator is shared by every tenant, so its settings can narrow
these (the chart's `policy` values; unset: anything the schema allows):

- `RATATOUILLE_ALLOWED_IMAGES`: comma-separated shell patterns (`fnmatch`, where `*` also
  matches `/`), e.g. `registry.example.com/ml/*`; the operator's own default trainer image is
  always allowed;
- `RATATOUILLE_ALLOWED_TOLERATION_KEYS`: comma-separated taint keys a run may tolerate (a
  toleration without a key tolerates every taint: allowed only with `*` in the list);
- `RATATOUILLE_ALLOWED_PRIORITY_CLASSES`: comma-separated PriorityClass names.

A run asking for anything else is refused before any Job exists: phase Failed, condition
Accepted=False with reason `NotAllowed` naming the field, and a Warning Event. Pure: no
Kubernetes client here.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Mapping

from .spec import RunSpec, SpecError

REASON_NOT_ALLOWED = "NotAllowed"


class PolicyError(SpecError):
    """A valid run that the operator's policy does not allow."""


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (value or "").split(",") if p.strip())


@dataclass(frozen=True)
class Policy:
    images: tuple[str, ...] = ()
    toleration_keys: tuple[str, ...] = ()
    priority_classes: tuple[str, ...] = ()

    @staticmethod
    def from_env(env: Mapping[str, str]) -> "Policy":
        return Policy(images=_split(env.get("RATATOUILLE_ALLOWED_IMAGES")),
                      toleration_keys=_split(env.get("RATATOUILLE_ALLOWED_TOLERATION_KEYS")),
                      priority_classes=_split(env.get("RATATOUILLE_ALLOWED_PRIORITY_CLASSES")))

    def check(self, spec: RunSpec, default_image: str) -> None:
        """Raise PolicyError naming the first field the policy does not allow."""
        tp = spec.template
        image = tp.image
        if self.images and image and image != default_image and \
                not any(fnmatchcase(image, p) for p in self.images):
            raise PolicyError("spec.template.image", f"{image!r} is not allowed by the operator's policy"
                              f" (allowed images: {', '.join(self.images)})")
        if self.toleration_keys:
            for i, toleration in enumerate(tp.tolerations):
                key = str(toleration.get("key") or "")
                if "*" in self.toleration_keys or (key and key in self.toleration_keys):
                    continue
                what = f"key {key!r}" if key else "no key (it tolerates every taint)"
                raise PolicyError(f"spec.template.tolerations[{i}]",
                                  f"a toleration with {what} is not allowed by the operator's policy"
                                  f" (allowed keys: {', '.join(self.toleration_keys)})")
        if self.priority_classes and tp.priority_class_name and tp.priority_class_name not in self.priority_classes:
            raise PolicyError("spec.template.priorityClassName",
                              f"{tp.priority_class_name!r} is not allowed by the operator's policy"
                              f" (allowed: {', '.join(self.priority_classes)})")
