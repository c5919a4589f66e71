"""Old command-line module paths fail with an error naming the new one."""

import importlib
import subprocess
import sys

import pytest

MOVED = {"medift.base_model": "medift.embedded", "medift.model.tiny": "medift.testing.tiny_checkpoints"}


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_old_module_names_the_new_one(old, new):
    sys.modules.pop(old, None)
    with pytest.raises(ImportError, match=new.replace(".", r"\.")):
        importlib.import_module(old)
    run = subprocess.run([sys.executable, "-m", old, "--help"], capture_output=True, text=True)
    assert run.returncode == 2 and f"python -m {new}" in run.stderr
