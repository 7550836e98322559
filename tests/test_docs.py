"""The README, CI script and docs stay true to the code."""

from __future__ import annotations

import re

import h5py

from conftest import REPO, run_job
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, open_results


def _quickstart():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quickstart.*?```bash\n(.*?)```", readme, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip()]


def test_readme_quickstart_has_two_commands_and_ci_runs_the_test_one():
    commands = _quickstart()
    assert len(commands) == 2
    assert "fedmpi.run" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_every_results_field_is_documented(tmp_path):
    doc = (REPO / "docs" / "results.md").read_text()
    for group, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS)):
        section = doc.split(f"## `/{group}`")[1].split("\n## ")[0]
        for name in fields:
            assert f"| `{name}` |" in section, f"/{group}/{name} is not documented"
    # and every object and root attribute of a real file
    proc = run_job(None, ["--set", "rounds=2", "--set", "output.snapshot_every=1", "--out", "r.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open_results(tmp_path / "r.h5") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            assert f"`{name.split('/')[-1]}`" in doc, f"{name} is not in docs/results.md"
        for attr in list(f.attrs) + list(f["model"].attrs):
            assert f"`{attr}`" in doc, f"attribute {attr} is not in docs/results.md"


def test_every_config_key_is_documented():
    from fedmpi.config import Config

    doc = (REPO / "docs" / "config.md").read_text()

    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]

    for key in keys(Config().to_dict()):
        leaf = key.rsplit(".", 1)[-1]
        assert f"`{key}`" in doc or f"`.{leaf}`" in doc or f", `.{leaf}`" in doc, f"{key} is not in docs/config.md"
