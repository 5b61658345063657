"""Constants of the chest analyzer (labels, classes, input size, model names), importable without torch."""

LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
"""ChestX-ray14 labels in the paper's (and the dataset's usual) output order."""

NIH_LABELS = ("Atelectasis", "Effusion", "Infiltration", "Pneumonia", "Edema")
"""Labels the classifier head is trained on from NIH ChestX-ray14 images (enough positives in the bundled set)."""

SYNTHESISED = ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax", "Consolidation")
"""Labels the phantom generator can draw."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224

SEGMENTS = ("right_lung", "left_lung", "heart")
"""The U-Net's output channels in order, independent sigmoids (the cardiomediastinal "heart" overlaps the
lungs' medial edges); the patient's right lung is on the image's left (PA display)."""
SEGMENTER = "lung_heart_unet"
CLASSIFIER = "thoracic_classifier"

CTR_CARDIOMEGALY = 0.5
"""Cardiothoracic ratio above which the heart is called enlarged (PA convention)."""
