"""Thread defaults and the session options recorded in manifests."""

from __future__ import annotations

import pytest

from metatt_deploy.common.errors import MetaTTError
from metatt_deploy.common.threads import available_cpus, resolve_threads, session_options_record


def test_default_is_every_available_cpu_and_bad_values_are_errors() -> None:
    assert resolve_threads(None) == available_cpus() >= 1
    assert resolve_threads(3) == 3
    with pytest.raises(MetaTTError, match="at least 1"):
        resolve_threads(0)
    record = session_options_record(2)
    assert record == {
        "intra_op_num_threads": 2,
        "inter_op_num_threads": 1,
        "execution_mode": "ORT_SEQUENTIAL",
        "graph_optimization_level": "ORT_ENABLE_ALL",
    }
