"""The testbed reference model's trainer (``crossget testbed-train``, ``make reference-model``).

``train`` runs both stages and the language stage; ``vision_pretrain`` the dense patch-label
pretraining of the vision tower (stage 1); ``grounding`` the supervised-attention losses;
``pixels`` what both stages share. Imports go one way: train -> vision_pretrain, grounding,
pixels; vision_pretrain -> pixels; nothing here imports train.
"""
