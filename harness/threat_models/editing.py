"""Editing (PhotoGuard's threat model): the attacker edits a protected photo with the diffusion model.

Success: the edit of the (purified) protected photo looks like the edit of the clean photo under the same seed
and prompt. The floor is the same photo edited under another seed: two edits that share only the input and the
prompt, so it is what an edit gets with nothing to learn from the protection's absence.
"""

from harness.threat_models import ThreatModel

THREAT_MODEL = ThreatModel(
    name="editing",
    reference="clean_run",
    success="ssim",
    attack="edit",
    floor="the same image edited with another seed",
    positive_control="the same edit of the clean image",
    floor_reseeds=True,
)
