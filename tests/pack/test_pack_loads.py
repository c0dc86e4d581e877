"""The pack loads in the real host, with and without optional dependencies, and its node ids are its own."""
import os
import subprocess
import sys

import host_harness as harness


def test_pack_registers_nodes_in_the_host(host):
    import nodes

    ours = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if "comfyui_likeness" in getattr(v, "__module__", "")}
    expected = {"LikenessFusionGuider", "LikenessFusionSampler", "LikenessKSamplerFusion", "LikenessPrompt",
                "LikenessConceptText", "LikenessConceptEmbedding", "LikenessDDIMInversion"}
    assert expected <= set(ours), sorted(ours)
    for node_id, cls in ours.items():
        assert node_id.startswith("Likeness"), node_id
        assert cls.GET_SCHEMA().category.startswith("Likeness"), node_id
    failed = [p for p, ok in getattr(nodes, "LOADED_MODULE_DIRS", {}).items() if "likeness" in p and not ok]
    assert not failed


def test_pack_imports_without_optional_dependencies(tmp_path):
    """A fresh host process where insightface, onnxruntime, cv2 and mediapipe cannot be imported."""
    # Shadow each optional package with one that fails to import, as on a machine without it.
    blocked = tmp_path / "blocked"
    for name in ("insightface", "onnxruntime", "cv2", "mediapipe", "skimage", "accelerate"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ModuleNotFoundError({name + ' is blocked by the test'!r}, name={name!r})\n")
    base = tmp_path / "base"
    harness.link_pack(str(base / "custom_nodes"))
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    cmd = [sys.executable, "main.py", "--cpu", "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--quick-test-for-ci"]
    p = subprocess.run(cmd, cwd=harness.comfy_dir(), env=env, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "IMPORT FAILED" not in log, log[-4000:]
    assert "Likeness:" not in log, log[-4000:]  # our loader logs families that failed to import
    assert "comfyui_likeness" in log  # listed among loaded custom nodes
