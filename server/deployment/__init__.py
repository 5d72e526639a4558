"""What runs on the server's host of a hospital deployment: provisioning the CA, certificates and site keys
(``provision``, ``facefl deploy``), running Flower's SuperLink with TLS and an allow-list of sites (``superlink``,
``facefl superlink``), and starting and following runs on it through Flower's ``flwr`` command (``flwr_cli``).
The site's side is ``client/supernode.py``; both use ``common.deployment`` and ``common.processes``. May import
``common``; never ``client`` or ``simulations``.
"""
