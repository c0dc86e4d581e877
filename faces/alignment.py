"""5-point face alignment onto the ArcFace template, in torch and differentiable (grid_sample).

The template and the similarity (rotation + uniform scale + translation) fit follow insightface's
face_align.py / docs/methods/faces.md; the fit is Umeyama's least-squares solution, written here from the paper's
equations. warp_affine reproduces cv2.warpAffine's pixel convention (pixel centres at integer coordinates,
bilinear, zero border), so aligned crops match insightface's norm_crop to interpolation rounding."""
import torch
import torch.nn.functional as F

# Landmark positions in the 112 x 112 aligned ArcFace crop (left eye, right eye, nose, mouth left, mouth right)
ARCFACE_TEMPLATE_112 = torch.tensor([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                     [41.5493, 92.3655], [70.7299, 92.2041]], dtype=torch.float64)


def arcface_template(size: int = 112) -> torch.Tensor:
    """The template for a size x size crop: scaled for multiples of 112, scaled and shifted 8 px for 128."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE_112 * ratio + torch.tensor([8.0 * ratio, 0.0], dtype=torch.float64)
    raise ValueError(f"size: the ArcFace template is defined for multiples of 112 or 128, got {size}")


def similarity_matrices(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms mapping src points onto dst points (Umeyama 1991).

    src: (B, N, 2); dst: (N, 2) or (B, N, 2). Returns (B, 2, 3) matrices M with dst ~ M @ [x, y, 1]."""
    src = torch.as_tensor(src, dtype=torch.float64)
    dst = torch.as_tensor(dst, dtype=torch.float64, device=src.device)
    if src.ndim == 2:
        src = src.unsqueeze(0)
    if dst.ndim == 2:
        dst = dst.unsqueeze(0).expand_as(src)
    n = src.shape[1]
    mu_s, mu_d = src.mean(1, keepdim=True), dst.mean(1, keepdim=True)
    s_c, d_c = src - mu_s, dst - mu_d
    var_s = (s_c ** 2).sum(dim=(1, 2)) / n
    cov = d_c.transpose(1, 2) @ s_c / n                        # (B, 2, 2)
    u, sig, vt = torch.linalg.svd(cov)
    d = torch.ones_like(sig)
    d[:, 1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vt))   # no reflections
    d[:, 1] = torch.where(d[:, 1] == 0, torch.ones_like(d[:, 1]), d[:, 1])
    rot = u @ torch.diag_embed(d) @ vt
    scale = (sig * d).sum(1) / var_s.clamp_min(1e-12)
    trans = mu_d.squeeze(1) - scale[:, None] * (rot @ mu_s.transpose(1, 2)).squeeze(-1)
    return torch.cat([scale[:, None, None] * rot, trans[:, :, None]], dim=2)


def invert_affine(m: torch.Tensor) -> torch.Tensor:
    a, t = m[:, :, :2], m[:, :, 2:]
    a_inv = torch.linalg.inv(a)
    return torch.cat([a_inv, -a_inv @ t], dim=2)


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, size: int) -> torch.Tensor:
    """cv2.warpAffine(image, M, (size, size)) for a batch: (B, C, H, W) -> (B, C, size, size), differentiable.

    matrices (B, 2, 3) map source pixel coordinates to output pixel coordinates."""
    b, _, h, w = images.shape
    inv = invert_affine(matrices.to(torch.float64))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64), indexing="ij")
    out_pts = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).reshape(1, -1, 3).to(inv.device)
    src = out_pts @ inv.transpose(1, 2)                               # (B, size*size, 2)
    gx = (2.0 * src[..., 0] + 1.0) / w - 1.0                           # pixel centre -> align_corners=False
    gy = (2.0 * src[..., 1] + 1.0) / h - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(b, size, size, 2).to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def alignment_matrices(landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """(B, 5, 2) landmarks in source pixels -> (B, 2, 3) matrices onto the ArcFace template."""
    return similarity_matrices(landmarks, arcface_template(size))


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Aligned size x size faces from (B, C, H, W) images and (B, 5, 2) landmarks; gradients reach `images`."""
    landmarks = torch.as_tensor(landmarks)
    if landmarks.ndim == 2:
        landmarks = landmarks.unsqueeze(0)
    if landmarks.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks: expected (batch, 5, 2) points, got {tuple(landmarks.shape)}")
    if landmarks.shape[0] == 1 and images.shape[0] > 1:
        landmarks = landmarks.expand(images.shape[0], 5, 2)
    if landmarks.shape[0] != images.shape[0]:
        raise ValueError(f"landmarks: {landmarks.shape[0]} sets of points for {images.shape[0]} images")
    return warp_affine(images, alignment_matrices(landmarks.detach().to(images.device), size), size)
