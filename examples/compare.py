"""The docs/extending.md comparison: Krum and DnC (fedmpi_ext.rules:dnc), each against
ALIE and ByzMean (fedmpi_ext.attacks:byzmean), on the tutorial's data set and model,
under mpirun; then the summary table and the plots of python -m fedmpi.analyze.

    python examples/compare.py [--ranks 3] [--rounds 30] [--out runs/extending]

Writes <out>/<rule>_<attack>.h5 (runs already finished are kept) and <out>/plots/;
with --figure PATH also copies the accuracy plot there (docs/images/extending_accuracy.png).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = {"krum": "krum", "dnc": "fedmpi_ext.rules:dnc"}
ATTACKS = {"alie": "alie", "byzmean": "fedmpi_ext.attacks:byzmean"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default="runs/extending")
    parser.add_argument("--figure", help="copy the accuracy plot here")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    for rule, rule_name in RULES.items():
        for attack, attack_name in ATTACKS.items():
            path = out / f"{rule}_{attack}.h5"
            if path.exists():
                continue
            cmd = ["mpirun", "-n", str(args.ranks), sys.executable, "-m", "fedmpi.run", "--config",
                   str(HERE / "extension_run.yaml"), "--set", f"rounds={args.rounds}", "--set", f"aggregator.name={rule_name}",
                   "--set", f"attack.name={attack_name}", "--out", str(path), "--quiet"]
            if rule == "krum":  # DnC's parameters do not apply to Krum
                cmd += ["--set", "aggregator.params={}"]
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, env=env, check=True)
    subprocess.run([sys.executable, "-m", "fedmpi.analyze", str(out), "--plot", str(out / "plots")], env=env, check=True)
    if args.figure:
        shutil.copy(out / "plots" / "accuracy_loss.png", args.figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
