"""No refactor changes a recipe: every resolvable config equals its record.

``tests/data/resolved_configs.json`` (written by ``python -m tests.resolved_configs --write``)
holds, for every config file, method and backbone option, the validated config or the error a
user gets. A difference is either a bug or an intended recipe change; the latter rewrites the
record, and its diff is reviewed with the change.
"""

from __future__ import annotations

import json

from hdml_jax import methods
from tests.resolved_configs import FIXTURE, resolve_all


def test_every_config_file_method_and_backbone_resolves_as_recorded():
    recorded = json.loads(FIXTURE.read_text())
    resolved = resolve_all(methods.names())
    assert sorted(resolved) == sorted(recorded), "the set of (config, method, backbone) changed"
    changed = [key for key in recorded if resolved[key] != recorded[key]]
    details = []
    for key in changed[:5]:
        old, new = recorded[key], resolved[key]
        if isinstance(old, dict) and isinstance(new, dict):
            diff = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
            details.append(f"{key}: top-level fields {sorted(diff)} differ")
        else:
            details.append(f"{key}: {old!r:.200} → {new!r:.200}")
    assert not changed, f"{len(changed)} resolved configs changed:\n" + "\n".join(details)
