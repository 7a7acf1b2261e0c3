"""Data: sources read by index and the input pipeline that feeds the trainer.

`sources` (the `Source` interface, `ArraySource`, `DatasetError`), `digits` (the
embedded 8x8 digits), `captions` (the digits with captions measured from each image, for the
text-to-image demo) and `text_encoder` (the fixed encoder of those captions), `mixture`
(the toy Gaussian mixture and its exact denoiser),
`tfds_source` (prepared TFDS image datasets such as ImageNet, and their preprocessing),
`prepare` (the command that prepares them), `synthetic` (an ImageNet-shaped TFDS dataset
made on the spot, for tests and benchmarks), `text_image` (text-image datasets built from
the user's captions and text-encoder outputs), `image_folder` (image datasets built from
the user's folders or EDM-style zips of images, and their record), `latents` (a prepared
image dataset encoded once by a VAE for latent diffusion, its source and the decoder of its
samples), `train_vae` (the command that trains a small VAE for them), `pipeline` (the
deterministic multi-host order, decoding ahead, global batches). `config.build.make_source` picks the source a
config names.
"""
