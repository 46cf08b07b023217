"""Clear errors for unknown models, export misuse, zoo progress and the GEMM peak; no long timings."""
import pytest
from typer.testing import CliRunner

import emov2
from emov2.cli import app
from emov2.factory import UnknownModelError


def _one_line_error(output: str) -> str:
    """The ``error: ...`` line of a CLI run; fails if there is none or if a traceback was printed."""
    assert "Traceback" not in output, output
    lines = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, output
    return lines[0]


# --- unknown model names ------------------------------------------------------------------------

@pytest.mark.parametrize("name, closest", [("emov2_1mm", "emov2_1m"), ("emov25m", "emov2_5m"),
                                           ("EMOv1_6M", "emov1_6m")])
def test_create_model_unknown_name_suggests_closest(name, closest):
    with pytest.raises(ValueError) as info:
        emov2.create_model(name)
    assert isinstance(info.value, UnknownModelError)
    msg = str(info.value)
    assert f"did you mean {closest!r}?" in msg
    assert all(m in msg for m in emov2.list_models())
    assert info.value.suggestion == closest


def test_create_model_unrelated_name_lists_models_without_a_guess():
    with pytest.raises(UnknownModelError, match="unknown model 'resnet50'") as info:
        emov2.create_model("resnet50")
    assert "did you mean" not in str(info.value) and "emov2_5m" in str(info.value)


def test_cli_export_unknown_model_suggests_closest():
    res = CliRunner().invoke(app, ["export", "--model", "emov2_1mm"])
    assert res.exit_code == 2
    line = _one_line_error(res.output)
    assert "unknown model 'emov2_1mm'" in line and "did you mean 'emov2_1m'?" in line and "emov1_6m" in line
