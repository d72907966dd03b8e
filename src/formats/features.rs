//! The published datasets' schema, in Arrow and in `datasets`' feature JSON.
//!
//! Features are written in the `Sequence`/`[{...}]` form that every `datasets`
//! release reads (2.x through 5.x, which maps it to `List`).

use crate::formats::simpo::BinarizedRow;
use arrow_array::{
    ArrayRef, RecordBatch, StringArray,
    builder::{Float64Builder, ListBuilder, StringBuilder, StructBuilder},
};
use arrow_schema::{DataType, Field, Fields, Schema};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::Arc;

/// Rows per Arrow record batch (and parquet row group): `datasets`' own
/// writer batch size, and small enough that no batch holds a whole split.
pub const BATCH_ROWS: usize = 1000;

/// `prompt_id` as the published datasets compute it: hex SHA-256 of the prompt.
pub fn prompt_id(prompt: &str) -> String {
    Sha256::digest(prompt.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

fn message_fields() -> Fields {
    Fields::from(vec![Field::new("content", DataType::Utf8, true), Field::new("role", DataType::Utf8, true)])
}

fn messages_type() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Struct(message_fields()), true)))
}

/// `datasets`' feature description of the columns.
pub fn features_json() -> Value {
    let string = json!({"dtype": "string", "_type": "Value"});
    let messages = json!([{"content": string, "role": string}]);
    // serde_json's map keeps keys sorted, but `datasets` orders columns by the
    // Arrow schema, so the JSON order does not matter.
    json!({
        "prompt_id": string,
        "prompt": string,
        "all_generated_responses": {"feature": string, "_type": "Sequence"},
        "all_rm_scores": {"feature": {"dtype": "float64", "_type": "Value"}, "_type": "Sequence"},
        "chosen": messages,
        "rejected": messages,
    })
}

/// The Arrow schema, carrying the features under the `huggingface` metadata key
/// as `datasets` writes it.
pub fn schema() -> Arc<Schema> {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    let fields = vec![
        Field::new("prompt_id", DataType::Utf8, true),
        Field::new("prompt", DataType::Utf8, true),
        Field::new("all_generated_responses", list(DataType::Utf8), true),
        Field::new("all_rm_scores", list(DataType::Float64), true),
        Field::new("chosen", messages_type(), true),
        Field::new("rejected", messages_type(), true),
    ];
    let meta = HashMap::from([("huggingface".to_string(), huggingface_metadata())]);
    Arc::new(Schema::new(fields).with_metadata(meta))
}

/// The value of the `huggingface` schema metadata key.
pub fn huggingface_metadata() -> String {
    json!({"info": {"features": features_json()}}).to_string()
}

fn messages_column(rows: &[BinarizedRow], pick: fn(&BinarizedRow) -> &[crate::formats::simpo::Message]) -> ArrayRef {
    let item = Field::new("item", DataType::Struct(message_fields()), true);
    let mut b =
        ListBuilder::new(StructBuilder::from_fields(message_fields(), rows.len() * 2)).with_field(Arc::new(item));
    for row in rows {
        let s = b.values();
        for m in pick(row) {
            s.field_builder::<StringBuilder>(0).expect("content is a string field").append_value(&m.content);
            s.field_builder::<StringBuilder>(1).expect("role is a string field").append_value(&m.role);
            s.append(true);
        }
        b.append(true);
    }
    Arc::new(b.finish())
}

/// The rows as one Arrow record batch of `schema()`.
pub fn record_batch(rows: &[BinarizedRow]) -> RecordBatch {
    let ids: StringArray = rows.iter().map(|r| Some(prompt_id(&r.prompt))).collect();
    let prompts: StringArray = rows.iter().map(|r| Some(r.prompt.as_str())).collect();
    let mut responses = ListBuilder::new(StringBuilder::new());
    let mut scores = ListBuilder::new(Float64Builder::new());
    for r in rows {
        for t in &r.all_generated_responses {
            responses.values().append_value(t);
        }
        responses.append(true);
        scores.values().append_slice(&r.all_rm_scores);
        scores.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids),
        Arc::new(prompts),
        Arc::new(responses.finish()),
        Arc::new(scores.finish()),
        messages_column(rows, |r| &r.chosen),
        messages_column(rows, |r| &r.rejected),
    ];
    RecordBatch::try_new(schema(), columns).expect("columns match the schema")
}

#[cfg(test)]
mod tests {
    #[test]
    fn prompt_id_is_sha256_hex() {
        assert_eq!(super::prompt_id("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
