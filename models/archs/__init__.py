"""Architectures behind one door, ``registry.create_model(name, ...)`` (timm's ``_registry``):
Conv MobileNet V1 (section 6.3), the 56-layer serial CNN (Table 4), the FC SNN (Appendix E)."""
