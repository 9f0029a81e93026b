"""holons.finetune"""
