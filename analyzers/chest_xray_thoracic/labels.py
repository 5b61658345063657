"""Label names and input constants of the chest model, importable without torch (inference path)."""

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

SYNTHESISED = ("Cardiomegaly", "Effusion", "Mass", "Nodule", "Pneumothorax", "Consolidation")
"""Labels the phantom generator can draw; the bundled weights judge only these."""

SEG_CLASSES = ("background", "right_lung", "left_lung", "heart")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 224
