"""The lab's items C1-C8, E and Q, one file each holding both the item's runs and its report section
(each exports one ITEM). Items never import each other; what two items share lives in lab.context or
lab.sections, and lab.registry lists them."""
