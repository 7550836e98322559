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


def documented_config_keys(doc: str) -> set[str]:
    """Keys named in the first cell of docs/config.md's table rows; `.leaf` after a full
    key means the leaf in that key's own section (`server.beta1`, `.tau` -> server.tau)."""
    keys = set()
    for line in doc.splitlines():
        cells = line.split("|")
        if len(cells) < 3:
            continue
        section = None
        for name in re.findall(r"`([a-z_0-9.]+)`", cells[1]):
            if name.startswith("."):
                if section is not None:
                    keys.add(section + name)
            else:
                keys.add(name)
                section = name.rsplit(".", 1)[0] if "." in name else ""
    return keys


def test_documented_keys_stay_in_their_own_section():
    keys = documented_config_keys("| `server.beta1`, `.tau` | x |\n| `aggregator.tau` | y |\n| `seed` | z |")
    assert keys == {"server.beta1", "server.tau", "aggregator.tau", "seed"}
    assert "aggregator.beta1" not in documented_config_keys("| `server.beta1` | x |\n| `aggregator.tau`, `.iterations` | y |")


def test_every_config_key_is_documented():
    from fedmpi.config import Config

    documented = documented_config_keys((REPO / "docs" / "config.md").read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            yield from keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]

    missing = [key for key in keys(Config().to_dict()) if key not in documented]
    assert not missing, f"not in docs/config.md: {missing}"
