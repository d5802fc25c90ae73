"""Style mimicry (Glaze's, Mist's and Anti-DreamBooth's threat model): the attacker finetunes the model on an
artist's protected works and generates in their style.

Success: the generations look like the artist's works (per image, each generation against the work its caption
came from; set measures against the artist's held-out works). The floor is the base model prompted with the
same captions and no finetune: what the attacker gets without learning anything from the images.
"""

from harness.threat_models import ThreatModel

THREAT_MODEL = ThreatModel(
    name="mimicry",
    reference="clean_images",
    success="style_match",
    attack="mimic",
    floor="the base model prompted with the artist's captions, no finetune",
    positive_control="the same finetune on the clean images",
)
