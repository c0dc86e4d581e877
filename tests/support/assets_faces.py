"""What the shipped face workflows need in a test host: their insightface pack (antelopev2) is a tiny random pack
with insightface's real file layout and model shapes (fixtures_faces.write_pack), placed by standins.py under
models/insightface/models/antelopev2. Its detector reports one centred face in any image and its recognizer is a
random IResNet, so the graphs run end to end through insightface's own code; the numbers mean nothing."""
SHRINK = {}
