"""The model-repository contract, in code: the formulas and checks that training and the service share.

Torch-free and FastAPI-free, so both halves import it (models/README.md is the same contract in prose):
  formulas   grey-level mapping, bits per dim, the importance-sampling noise and its log-mean-exp,
             the compressor, the OOD scores and their calibration (thresholds, p-values)
  manifest   manifest.json's schema, file checksums and the manifest's own digest
"""
