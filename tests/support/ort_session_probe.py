"""Hold an onnxruntime session open for a few seconds, the way the pack's insightface backend does, optionally
after importing the pack's face package (which sets ORT_DISABLE_TELEMETRY before onnxruntime loads).

    python ort_session_probe.py [--with-pack] [seconds]

Run under strace by tests/pack/test_no_network.py to see which network lookups onnxruntime itself makes."""
import importlib.util
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_pack_faces():
    """The pack's faces package alone (its parent package is registered without running the node setup)."""
    spec = importlib.util.spec_from_file_location("comfyui_likeness", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    sys.modules["comfyui_likeness"] = importlib.util.module_from_spec(spec)
    import comfyui_likeness.faces  # noqa: F401


def main():
    args = sys.argv[1:]
    if "--with-pack" in args:
        import_pack_faces()
        args.remove("--with-pack")
    seconds = float(args[0]) if args else 12.0
    import numpy as np
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    end = time.time() + seconds
    while time.time() < end:
        session.run(None, {"x": np.ones(1, np.float32)})
        time.sleep(0.5)
    print("telemetry switch:", os.environ.get("ORT_DISABLE_TELEMETRY"))


if __name__ == "__main__":
    main()
