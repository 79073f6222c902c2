"""flexast's Python API is importable from a script that has its own ``model.py`` and ``pipeline.py``."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_a_users_own_model_and_pipeline_modules_do_not_shadow_flexast(tmp_path):
    (tmp_path / "model.py").write_text("WHOSE = 'user model'\n")
    (tmp_path / "pipeline.py").write_text("WHOSE = 'user pipeline'\n")
    script = tmp_path / "train_mine.py"
    script.write_text(
        textwrap.dedent(
            """
            import model, pipeline
            from flexast.model.ast import ASTModel
            from flexast.pipeline.batch import PackedBatch, token_count
            from flexast.model.cli import main as model_main
            from flexast.pipeline.cli import main as pipeline_main
            assert model.WHOSE == "user model" and pipeline.WHOSE == "user pipeline"
            assert token_count(128, 100, (16, 16)) == 48
            print("ok", ASTModel.__module__, PackedBatch.__module__)
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "flexast.model.ast", "flexast.pipeline.batch"]
