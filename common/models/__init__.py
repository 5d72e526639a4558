"""The models a site trains and the server aggregates: the face-embedding networks (``embedding``), dlib's
pretrained face ResNet as a PyTorch backbone (``dlib_resnet``), the margin and triplet losses (``losses``), the
convolutional VAE and its discriminator (``vae``), the federated models and their exchange format
(``federated``), and morph frames from a VAE (``morphing``). Every model is DP-compatible by construction
(GroupNorm/InstanceNorm, exact per-sample gradients for custom layers) and does no I/O; weights load only through
``common.weights``. May import the plumbing modules of ``common``; never ``common.data`` or
``common.anonymization``.
"""
