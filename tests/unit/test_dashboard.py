"""The Grafana dashboard queries exactly the metrics elastic_ep.metrics defines, under the names Ray exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from elastic_ep.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "dashboards" / "elastic_ep_grafana.json"
SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_every_query_names_a_defined_metric_and_every_metric_has_a_panel():
    dash = json.loads(DASHBOARD.read_text())
    exported = {f"ray_{name}{suffix}": name for name, d in METRICS.items() for suffix in SUFFIXES[d.kind]}
    used = set()
    for expr in _exprs(dash) + [dash["templating"]["list"][1]["definition"]]:
        names = set(re.findall(r"\bray_elastic_ep_\w+", expr))
        assert names, f"query reads no elastic-ep metric: {expr}"
        unknown = names - set(exported)
        assert not unknown, f"{expr} reads {unknown}, which elastic_ep.metrics does not define"
        used |= {exported[n] for n in names}
    assert used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - used)}"


def test_histograms_are_read_through_their_buckets_and_panels_do_not_overlap():
    dash = json.loads(DASHBOARD.read_text())
    for expr in _exprs(dash):
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and "by (le" in expr, expr
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"panel {p['title']!r} overlaps another"
        assert g["x"] + g["w"] <= 24, p["title"]
        cells |= area
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
