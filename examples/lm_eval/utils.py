"""Multiple-choice items from the demo dev questions (models/demo/dev.jsonl), for demo_mc.yaml:
each question's expected answer and the same sentence with three other values of its kind (the
next ones in the file), the right one at position index % 4. Deterministic: no sampling."""


def multiple_choice(dataset):
    values = {}
    for doc in dataset:
        kind_values = values.setdefault(doc["kind"], [])
        if doc["value"] not in kind_values:
            kind_values.append(doc["value"])

    def add_choices(doc, index):
        pool = values[doc["kind"]]
        start = pool.index(doc["value"])
        others = [pool[(start + k) % len(pool)] for k in range(1, 4)]
        label = index % 4
        options = others[:label] + [doc["value"]] + others[label:]
        return {"choices": [doc["answer"].replace(doc["value"], v) for v in options], "label": label}

    return dataset.map(add_choices, with_indices=True)
