"""The site side (a hospital or a device): the ClientApp (``app``) that translates Flower messages (``messages``,
``secure`` and ``secagg_mod`` for SecAgg+) into one training round as a plain function (``site``), the local
training loops with and without DP-SGD (``train``), and the site's privacy ledger (``privacy``). In a deployment
a site runs Flower's SuperNode through ``supernode`` (``facefl site``), and runs only the apps its operator approved
(``app_approval``: the signed approvals; ``app_launcher`` and ``app_gate``: the check before any app code runs); on a
device ``photos`` anonymizes image files (``facefl anonymize``). May import ``common`` only.
"""
