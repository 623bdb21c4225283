"""A command line Hydra or the schema refuses is one line on stderr naming the key or option and what it may
be, exit code 2, in a single run and in a multirun alike."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCHEDULER_KEYS = "(keys: max_num_seqs, max_num_batched_tokens, enable_chunked_prefill"


@pytest.mark.parametrize(
    "args,line",
    [
        (["scheduler.no_such_key=1"], f"scheduler.no_such_key is not a key of scheduler {SCHEDULER_KEYS}"),
        (["--multirun", "workload=no_such_workload,sharegpt"],
         "workload=no_such_workload: no such option; choose one of azure_code, azure_conv, azure_conv_20min, "
         "mooncake, mt_bench, sharegpt, splitwise_conv, synthetic"),
        (["+foo.bar=1"], "+foo.bar=1: foo is not a section of the config, so nothing would read it "
                         "(sections: backend, workload, model,"),
        (["scheduler.max_num_seqs=[1"], "scheduler.max_num_seqs=[1: not an override Hydra can parse"),
        (["scheduler.max_num_seqs="], "scheduler.max_num_seqs='': expected an integer"),
    ],
    ids=["unknown-key", "unknown-option-multirun", "added-section", "unparsable", "empty-value"],
)
def test_a_refused_command_line_is_one_line_and_exit_code_2(tmp_path, args, line):
    cmd = [sys.executable, "-m", "servebench.workbench", *args, f"hydra.run.dir={tmp_path}",
           f"hydra.sweep.dir={tmp_path}", "progress=false", "report=false", "workload.num_requests=5"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"workbench: error: {line}") and res.stderr.count("\n") == 1, res.stderr
    assert not list(tmp_path.rglob("summary.json"))
