"""Face data: identity-folder datasets and the LFW protocol files (``datasets``), detection and 5-point alignment
(``preprocess``), the synthetic smoke-test faces (``synthetic``), the in-memory face set (``faceset``),
augmentation (``augment``), identity partitions across sites (``partition``) and which faces each site and the
server's evaluation use (``sources``). May import the plumbing modules of ``common`` (``config``, ``atomic``);
never ``common.models`` or ``common.anonymization``.
"""
