"""The shared anonymization module, used alike on devices (``facefl anonymize``), at sites and by the server's
reports: detect every face and restyle its region (``anonymizer``) with a feed-forward stylizer (``stylizer``,
trained by ``style_train`` with ``perceptual`` losses; ``gatys`` is the slow reference method; ``styles`` names
and caches stylizer files), then let an independent recognizer (dlib's ResNet, ``recognizer``) verify that the
face no longer matches before anything leaves (``egress``, the gate every image passes). ``reid`` measures
re-identification, detection and landmark shifts for the benchmarks. The protection is empirical, measured by
re-identification rates; dlib is the judge and is never trained against. May import ``common.data`` and the
plumbing modules of ``common``; never ``common.models`` (the identity model it trains against is passed in).
"""
