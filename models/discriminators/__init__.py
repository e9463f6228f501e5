"""The discriminators of adversarial training: HiFi-GAN's multi-period / multi-scale pair and
MetricGAN's PESQ predictor."""
