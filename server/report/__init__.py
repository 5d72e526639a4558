"""``facefl report``: the self-contained HTML page (and ``summary.json``) of one run or several.

``reader`` reads a run directory, ``evaluate`` computes ROC, distances and VAE images from its checkpoint,
``build`` (the entry point) runs both and passes every face through the egress gate, ``sections`` holds the
dataclasses of what the page shows, ``charts`` draws line charts and histograms with matplotlib as inline SVG, and
``render`` fills the Jinja2 template in ``templates/``. Imports run one way: build -> render -> charts and sections ->
reader and evaluate; nothing here imports build.
"""
