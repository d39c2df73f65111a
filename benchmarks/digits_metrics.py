# Copyright 2026 The trl_ddrl Authors. Licensed under the Apache License, Version 2.0.
"""
Fidelity metrics for the embedded digits generator, judged by networks that neither the generator nor the reward saw.

[`FidelityJudge`] trains a [`~trl_ddrl.digits.DigitClassifier`] on the held-out `"eval"` split (disjoint from the
`"base"` split the generator learnt from and from the `"reward"` split behind the classifier reward) and reports, for
samples `[N, 1, 16, 16]` in `[0, 1]` with their prompted labels:

- `accuracy`: how often the held-out classifier reads the prompted digit;
- `fd`: the Fréchet distance between the samples and the real `"eval"` digits in the held-out classifier's penultimate
  feature space (the 512 flattened conv features), pooled over the classes, like FID;
- `diversity`: the mean pairwise pixel L2 distance between samples of the same prompt, averaged over prompts.
"""

import numpy as np
import torch

from trl_ddrl.digits import load_digits_split, train_digit_classifier


def frechet_distance(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray) -> float:
    """
    `||mu_a - mu_b||^2 + Tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2))`, the Fréchet distance of two Gaussians `[D]`,
    `[D, D]` (the FID formula). `Tr (cov_a cov_b)^(1/2)` is the sum of the square roots of the eigenvalues of the
    symmetric `cov_b^(1/2) cov_a cov_b^(1/2)`, which `eigvalsh` gives in milliseconds where `sqrtm` takes seconds.
    """
    diff = mu_a - mu_b
    eigenvalues, eigenvectors = np.linalg.eigh(cov_b)
    root_b = (eigenvectors * np.sqrt(eigenvalues.clip(min=0))) @ eigenvectors.T
    product = np.linalg.eigvalsh(root_b @ cov_a @ root_b)
    trace_covmean = np.sqrt(product.clip(min=0)).sum()
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `[D]` and covariance `[D, D]` of features `[N, D]`."""
    return features.mean(axis=0), np.cov(features, rowvar=False)


def within_prompt_diversity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images `[N, 1, H, W]` of the same label `[N]`, averaged over labels."""
    distances = []
    for label in labels.unique().tolist():
        flat = images[labels == label].flatten(1).double()
        if len(flat) < 2:
            continue
        pairwise = torch.cdist(flat, flat)
        count = len(flat)
        distances.append((pairwise.sum() / (count * (count - 1))).item())
    return float(np.mean(distances))


class FidelityJudge:
    """
    The held-out judge: a digit classifier trained on the `"eval"` split with `seed`, and the feature statistics of the
    real `"eval"` digits.

    Args:
        seed (`int`, *optional*, defaults to `0`): Seed of the classifier's training.
    """

    def __init__(self, seed: int = 0):
        self.classifier = train_digit_classifier("eval", seed=seed)
        images, labels = load_digits_split("eval")
        self.real_stats = gaussian_stats(self.features(images))
        self.real_images, self.real_labels = images, labels

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Penultimate features `[N, 512]` of images `[N, 1, 16, 16]` in `[0, 1]`."""
        return self.classifier.features(images.float()).flatten(1).double().numpy()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """`accuracy`, `fd` and `diversity` of samples `[N, 1, 16, 16]` in `[0, 1]` prompted with `labels` `[N]`."""
        predictions = self.classifier(images.float()).argmax(dim=1)
        return {
            "accuracy": (predictions == labels).float().mean().item(),
            "fd": frechet_distance(*gaussian_stats(self.features(images)), *self.real_stats),
            "diversity": within_prompt_diversity(images, labels),
        }
