"""The site side (a hospital or a device): the ClientApp (``app``) that translates Flower messages (``messages``,
``secure`` and ``secagg_mod`` for SecAgg+) into one training round as a plain function (``site``), the local
training loops with and without DP-SGD (``train``), and the site's privacy ledger (``privacy``). In a deployment
a site runs Flower's SuperNode through ``supernode`` (``facefl site``); on a device ``photos`` anonymizes image
files (``facefl anonymize``). May import ``common`` only.
"""
