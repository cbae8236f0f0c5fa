"""Write k8s/base/prometheusrule.yaml from monitoring/deepvit.rules.yml.

    python monitoring/sync_k8s.py           # rewrite the PrometheusRule
    python monitoring/sync_k8s.py --check   # exit 1 if it differs (tests/deploy runs this check)

The rules file is the one source: Prometheus under compose loads it as it is, the Prometheus Operator
needs the same groups inside a PrometheusRule object. Kustomize cannot wrap a file into an object's spec,
hence this copy. Needs PyYAML (in the project's venv).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "monitoring" / "deepvit.rules.yml"
TARGET = ROOT / "k8s" / "base" / "prometheusrule.yaml"

HEADER = """\
# GENERATED from monitoring/deepvit.rules.yml by monitoring/sync_k8s.py: edit the rules file, not this one.
# The Prometheus Operator loads it; kube-prometheus-stack selects rules by label (set yours in an overlay).
"""


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render() -> str:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    obj = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "deepvit-serve",
            "labels": {"app.kubernetes.io/name": "deepvit-serve", "app.kubernetes.io/component": "alerting"},
        },
        "spec": {"groups": groups},
    }
    return HEADER + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run python monitoring/sync_k8s.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
