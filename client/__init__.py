"""The data owner's side: local DP-SGD training, privacy ledger and the Flower ClientApp."""
