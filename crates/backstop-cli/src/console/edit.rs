//! `/rows/{id}/edit`: edit a row's payload (and headers) and save it as a
//! new version, with a required note, optionally re-driving it at once.
//! The store keeps the original; the scanner re-drives the latest version
//! only.

use super::auth::Operator;
use super::pages::{self, csrf_field};
use super::{Page, PageError, Shared, render};
use axum::extract::{Extension, Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use backstop::store::CompensationStore;
use base64::Engine;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use maud::html;
use serde::Deserialize;
use tracing::info;

/// Headers as plain JSON for the form: `{"name": value}`, pretty.
fn headers_for_form(stored: &str) -> String {
    let table: FieldTable = serde_json::from_str(stored).unwrap_or_default();
    let object: serde_json::Map<String, serde_json::Value> = table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), render::amqp_json(v)))
        .collect();
    serde_json::to_string_pretty(&object).unwrap_or_else(|_| "{}".into())
}

/// A plain JSON value as an AMQP header value: strings as long strings,
/// integers as 64-bit integers, other numbers as doubles.
fn json_to_amqp(value: &serde_json::Value) -> AMQPValue {
    use serde_json::Value;
    match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut array = FieldArray::default();
            for v in a {
                array.push(json_to_amqp(v));
            }
            AMQPValue::FieldArray(array)
        }
        Value::Object(o) => AMQPValue::FieldTable(table_of(o)),
    }
}

fn table_of(object: &serde_json::Map<String, serde_json::Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in object {
        table.insert(k.as_str().into(), json_to_amqp(v));
    }
    table
}

/// The headers of the form, in the store's JSON form: `None` when they are
/// unchanged (the previous version's headers are kept exactly, types and
/// all).
fn headers_from_form(given: &str, shown: &str) -> Result<Option<String>, PageError> {
    let parse = |text: &str| serde_json::from_str::<serde_json::Value>(text);
    let given_value = parse(given)
        .map_err(|e| PageError::bad_request(format!("the headers are not JSON: {e}")))?;
    if parse(shown).ok().as_ref() == Some(&given_value) {
        return Ok(None);
    }
    let serde_json::Value::Object(object) = given_value else {
        return Err(PageError::bad_request(
            "the headers are a JSON object: {\"name\": \"value\", ...}",
        ));
    };
    serde_json::to_string(&table_of(&object))
        .map(Some)
        .map_err(|e| PageError::bad_request(format!("the headers cannot be stored: {e}")))
}

/// `GET /rows/{id}/edit`.
pub(crate) async fn edit_page(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<i64>,
) -> Page {
    let store = console.store()?;
    let row = store.get(id).await?;
    let text = std::str::from_utf8(&row.payload).ok();
    let (payload, encoding) = match text {
        Some(t) => (t.to_owned(), "text"),
        None => (
            base64::engine::general_purpose::STANDARD.encode(&row.payload),
            "base64",
        ),
    };
    let headers = headers_for_form(&row.headers);
    let body = html! {
        h1 { "Edit row " a href={ "/rows/" (row.id) } { (row.id) } }
        p.note {
            "The original payload stays stored; the edit becomes version " (row.version + 1)
            ", and every later re-drive sends it (never the original). Showing version " (row.version) "."
        }
        form.action method="post" action={ "/rows/" (row.id) "/edit" } id="edit-form" {
            (csrf_field(&op))
            input type="hidden" name="headers_shown" value=(headers);
            label for="edit-encoding" { "Payload encoding" }
            select id="edit-encoding" name="encoding" {
                option value="text" selected[encoding == "text"] { "text (UTF-8)" }
                option value="base64" selected[encoding == "base64"] { "base64 (binary)" }
            }
            label for="edit-payload" { "Payload" }
            textarea.big id="edit-payload" name="payload" spellcheck="false" { (payload) }
            label for="edit-headers" { "Headers (a JSON object; left as is, the headers stay exactly as stored)" }
            textarea id="edit-headers" name="headers" spellcheck="false" { (headers) }
            label for="edit-note" { "Note (required: why this edit)" }
            textarea id="edit-note" name="note" required {}
            p {
                button type="submit" id="edit-submit" name="retry" value="1" { "Save and retry" }
                " "
                button.secondary type="submit" id="edit-save" name="retry" value="0" { "Save only" }
            }
        }
    };
    Ok(pages::layout(&format!("Edit row {id}"), Some(&op), body))
}

/// The edit form.
#[derive(Deserialize)]
pub(crate) struct EditForm {
    #[serde(default)]
    payload: String,
    #[serde(default)]
    encoding: String,
    #[serde(default)]
    headers: String,
    #[serde(default)]
    headers_shown: String,
    #[serde(default)]
    note: String,
    #[serde(default)]
    retry: String,
}

/// `POST /rows/{id}/edit`.
pub(crate) async fn edit_submit(
    State(console): State<Shared>,
    Extension(op): Extension<Operator>,
    Path(id): Path<i64>,
    axum::Form(form): axum::Form<EditForm>,
) -> Result<Response, PageError> {
    let store = console.store()?;
    let note = form.note.trim();
    if note.is_empty() {
        return Err(PageError::bad_request("an edit needs a note saying why"));
    }
    // Browsers send a textarea's line ends as CRLF: a text payload keeps
    // the line ends the operator sees, as LF.
    let payload = match form.encoding.as_str() {
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(form.payload.trim())
            .map_err(|e| PageError::bad_request(format!("the payload is not base64: {e}")))?,
        _ => form.payload.replace("\r\n", "\n").into_bytes(),
    };
    let headers = headers_from_form(&form.headers, &form.headers_shown)?;
    let retry = form.retry == "1";
    let version = store
        .edit(id, payload, headers, &op.actor(), note, retry)
        .await?;
    info!(id, version, retry, actor = %op.actor(), "console edit");
    Ok(Redirect::to(&format!("/rows/{id}")).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_headers_are_kept_and_changed_ones_converted() {
        let stored = r#"{"x-tenant":{"ShortString":"acme"},"n":{"LongInt":5}}"#;
        let shown = headers_for_form(stored);
        assert_eq!(headers_from_form(&shown, &shown).expect("ok"), None);
        let changed = headers_from_form(r#"{"x-tenant":"beta","n":6}"#, &shown)
            .expect("ok")
            .expect("changed");
        let table: FieldTable = serde_json::from_str(&changed).expect("a header table");
        assert_eq!(
            render::headers(&changed),
            vec![
                ("n".to_owned(), "6".to_owned()),
                ("x-tenant".to_owned(), "beta".to_owned())
            ]
        );
        assert_eq!(table.inner().len(), 2);
        assert!(headers_from_form("[1]", &shown).is_err());
        assert!(headers_from_form("{", &shown).is_err());
    }
}
