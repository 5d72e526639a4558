"""Code shared by the server, the sites and the devices, in three subsystems and a few plumbing modules.

``common.data`` (face datasets, alignment, partitions), ``common.models`` (the embedding network, the VAE, their
losses and exchange format) and ``common.anonymization`` (the shared anonymization module: style transfer, the
independent recognizer, the egress gate). The top-level modules are plumbing every layer uses: ``config`` (the one
validated run configuration), ``atomic`` (atomic file writes), ``audit`` (hash-chained audit logs), ``weights``
(the only weight loader: local path + SHA-256), ``dlib_weights`` (dlib's face ResNet file read into a state
dict, converted once into the cache), ``metrics`` (verification and image metrics), ``secagg`` (SecAgg+
arithmetic), and, for deployments, ``deployment`` (what the SuperLink's host and the sites share), ``app_signature``
(apps signed by the federation's administrator) and ``processes`` (supervising a Flower process in the foreground). Nothing in ``common`` imports ``client``, ``server`` or
``simulations``; the plumbing modules import no subsystem.
"""
