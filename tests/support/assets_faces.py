"""Files the shipped face workflows need in a test host: a tiny insightface pack named buffalo_l.

The shipped workflows use realistic settings (buffalo_l, det_thresh 0.5). Here buffalo_l is a tiny random
pack with insightface's real file layout and model shapes (see fixtures_faces.py): its detector reports one
centred face in any image, and its recognizer is a random IResNet, so the graphs run end to end through
insightface's own code; the numbers they produce mean nothing."""
import os

from fixtures_faces import insightface_root, write_pack

PACK = "buffalo_l"


def prepare(base_dir: str, comfy_dir: str):
    folder = os.path.join(insightface_root(base_dir), "models", PACK)
    if not os.path.exists(os.path.join(folder, "w600k_r50.onnx")):
        write_pack(folder, detector="centre", recognizer="torch", seed=11)
